"""DINO self-supervised training of timm backbones on cytology images (tiles or cells), and export to `embed`.

| module | one job |
|---|---|
| `config` | the two recipes (resnet50, vit_small) and every hyperparameter of a run |
| `resume` | a resumed run's arguments: the checkpoint's, with only runtime settings changed |
| `head` | DINO head (weight-normalised last layer), student / teacher network on a timm backbone |
| `loss` | DINO cross-entropy over pairs of views, teacher centring and sharpening |
| `schedules` | cosine lr / weight decay / teacher momentum with warm-up, teacher temperature warm-up |
| `optim` | parameter groups, per-parameter clipping, last-layer freezing, the teacher's EMA |
| `augment` | DINO views, flips and 90-degree rotations, HED stain jitter, cell copy-paste |
| `data` | tile tables, image folders, manifests; slide splits; the seeded dataset, the resumable sampler |
| `distributed` | torchrun: process group (nccl / gloo), ranks, devices |
| `checkpoint` | weights_only checkpoints with RNG states as tensors, written atomically |
| `loop` | the training job: steps, log, checkpoints, Ctrl-C, collapse warning |
| `export` | teacher backbone -> safetensors + JSON config for `embed --weights` |
| `preview` | a PNG grid of what the model sees |

Nothing heavy is imported here: `cytoretrieve.cli.train` imports these modules inside its commands only.
"""
