"""Dense accuracy of a shipped small model (docs/small-models.md): python docs/snippets/dense_accuracy.py <model> <n prompts> <steps> [guidance, default 4].
Video models (small-wan) get the video prompts ("... moving left ...") and are classified frame by frame."""
import sys, torch
torch.set_num_threads(1)
from diffaccel.pipelines import evaluate as ev, small
name, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
guidance = float(sys.argv[4]) if len(sys.argv) > 4 else 4.0
pipe = small.load_small(name); pipe.set_progress_bar_config(disable=True)
acc = ev.dense_accuracy(pipe, ev.load_classifier(), n, steps, guidance)
print(name, n, steps, guidance, {k: round(v, 3) for k, v in acc.items()})
