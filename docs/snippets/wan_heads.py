"""A Wan model with another head layout, trained on images only against small-unet (docs/small-models.md, Limits):
python docs/snippets/wan_heads.py <heads> <head dim> <work dir> [<max steps> <decay from>]
(4 32: small-wan's layout, whose rotary embedding gives each spatial axis 10 of the 32 channels of a head; 2 64: 20 of 64.)
From scratch (or resumed from <work dir>/checkpoint.pt when it exists): image steps only, image noise shift 1, each
regressing small-unet's velocity, the text encoder from small-flux's, one thread; by default 1,000 steps with the
learning rate decaying from step 700; the export is <work dir>/export."""
import os
import sys

from diffaccel.pipelines import small
from diffaccel.pipelines.small import train as train_small

heads, head_dim, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
max_steps, decay_from = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (1000, 700)
small.DEFAULT_CONFIGS["wan"]["transformer"].update(num_attention_heads=heads, attention_head_dim=head_dim)
train_small.train_small("wan", work + "/export", work, minutes=60, max_steps=max_steps, cooldown_from=decay_from,
                        image_fraction=1.0, image_teacher="small-unet", image_timestep_shift=1.0,
                        text_encoder_from="small-flux", threads=1, sample_every=500, save_every=500,
                        resume=os.path.isfile(os.path.join(work, "checkpoint.pt")),
                        command="python docs/snippets/wan_heads.py " + " ".join(sys.argv[1:]))
