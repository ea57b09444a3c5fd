"""DINO self-supervised training of timm backbones on cytology images (tiles or cells), and export to `embed`.

| module | one job |
|---|---|
| `config` | every setting of a run, declared once: views, copy-paste, the two recipes (resnet50, vit_small) |
| `resume` | a resumed run's arguments: the checkpoint's, with only runtime settings changed |
| `head` | DINO head (weight-normalised last layer), student / teacher network on a timm backbone |
| `loss` | DINO cross-entropy over pairs of views, teacher centring and sharpening |
| `schedules` | cosine lr / weight decay / teacher momentum with warm-up, teacher temperature warm-up |
| `optim` | parameter groups, per-parameter clipping, last-layer freezing, the teacher's EMA |
| `augment` | DINO views, flips and 90-degree rotations, HED stain jitter, cell copy-paste |
| `data` | tile tables, image folders, manifests (`sources.resolve`); the split applied; the seeded dataset, the resumable sampler |
| `checkpoint` | weights_only checkpoints with RNG states as tensors, written atomically |
| `run` | a run built (data, models, loss, optimiser, schedules, restart) and saved: main_dino's set-up |
| `loop` | the training job: `train`, `train_one_epoch`, `dino_step`, the log, Ctrl-C |
| `collapse` | the collapse warning on DINO's two signatures, judged after warm-up |
| `export` | teacher backbone -> safetensors + JSON config for `embed --weights` |

Processes under torchrun: `cytoretrieve.distributed`; devices and workers: `cytoretrieve.runtime`; the preview
grid of what the model sees: `cytoretrieve.views.train_preview`. Nothing heavy is imported here:
`cytoretrieve.cli.train` imports these modules inside its commands only.
"""
