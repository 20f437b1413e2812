"""Dense accuracy of a shipped small model (docs/small-models.md): python docs/snippets/dense_accuracy.py <model> <n prompts> <steps>.
Video models (small-wan) get the video prompts ("... moving left ...") and are classified frame by frame."""
import sys, torch
torch.set_num_threads(1)
from diffaccel.pipelines import evaluate as ev, small
name, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = small.load_small(name); pipe.set_progress_bar_config(disable=True)
acc = ev.dense_accuracy(pipe, ev.load_classifier(), n, steps)
print(name, n, steps, {k: round(v, 3) for k, v in acc.items()})
