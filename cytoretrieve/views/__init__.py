"""Every picture: the classify plot and ROC curves (`plots`), the tiling preview (`slide_preview`), heat maps of
tile scores (`heatmap`), the trainer's view grid (`train_preview`). Views draw from data handed to them or read
from the store; they never open a slide file."""
