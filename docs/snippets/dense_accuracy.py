"""Dense accuracy of a shipped small model (docs/small-models.md): python docs/snippets/dense_accuracy.py <model> <n prompts> <steps>.
Video models (small-wan) get the video prompts ("... moving left ...") and are classified frame by frame."""
import sys, torch
torch.set_num_threads(1)
from diffaccel.pipelines import evaluate as ev, small
name, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = small.load_small(name); pipe.set_progress_bar_config(disable=True)
video = isinstance(pipe, small.SmallWanPipeline)
clf = ev.load_classifier()
prompts = ev.eval_prompts(n, video=video)
accs = []
for i in range(0, n, 8):
    ps = prompts[i:i+8]
    gens = [torch.Generator().manual_seed(j) for j in range(i, i+len(ps))]
    r = pipe(ps, num_inference_steps=steps, generator=gens, output_type="pt")
    accs.append(ev.classifier_accuracy(clf, r.frames if video else r.images, ps))
print(name, n, steps, {k: round(sum(a[k] for a in accs)/len(accs), 3) for k in accs[0]})
