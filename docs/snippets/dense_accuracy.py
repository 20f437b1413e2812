"""Dense accuracy of a shipped small model (docs/small-models.md):
python docs/snippets/dense_accuracy.py <model> <n prompts> <steps> [guidance, default 4] [images].
Video models (small-wan) get the video prompts ("... moving left ...") and are classified frame by frame; with
`images`, they draw single frames from the image prompts."""
import sys, torch
torch.set_num_threads(1)
from diffaccel.pipelines import small
from diffaccel.pipelines.small import evaluate as ev
name, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
images = sys.argv[-1] == "images"
args = sys.argv[1:-1] if images else sys.argv[1:]
guidance = float(args[3]) if len(args) > 3 else 4.0
pipe = small.load_small(name); pipe.set_progress_bar_config(disable=True)
acc = ev.dense_accuracy(pipe, ev.load_classifier(), n, steps, guidance, images=images)
print(name, n, steps, guidance, "images" if images else "", {k: round(v, 3) for k, v in acc.items()})
