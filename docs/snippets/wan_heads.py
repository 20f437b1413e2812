"""A Wan model with another head layout, trained on images only against small-unet (docs/small-models.md, Limits):
python docs/snippets/wan_heads.py <heads> <head dim> <work dir>
(4 32: small-wan's layout, whose rotary embedding gives each spatial axis 10 of the 32 channels of a head; 2 64: 20 of 64.)
1,000 image steps from scratch, the learning rate decaying from step 700, image noise shift 1, the image steps regressing
small-unet's velocity, the text encoder from small-flux's, one thread; the export is <work dir>/export."""
import sys

from diffaccel.pipelines import small, train_small

heads, head_dim, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
small.DEFAULT_CONFIGS["wan"]["transformer"].update(num_attention_heads=heads, attention_head_dim=head_dim)
train_small.train_small("wan", work + "/export", work, minutes=30, max_steps=1000, cooldown_from=700, image_fraction=1.0,
                        image_teacher="small-unet", image_timestep_shift=1.0, text_encoder_from="small-flux", threads=1,
                        sample_every=500, save_every=500, command=f"python docs/snippets/wan_heads.py {heads} {head_dim} {work}")
