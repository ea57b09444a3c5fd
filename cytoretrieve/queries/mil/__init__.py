"""Multiple-instance learning over bags of stored vectors: slide scoring (`cytoretrieve score`).

    bags.py       bags from any vector table with a group column + a group-label file (held in memory when they
                  fit, else read slide by slide from the table); annotated positives; MIL benchmark readers
                  (.npz, PRTools .mat) and their import into a store table
    models.py     ABMIL (attention, gated attention), mean / max pooling, top-k instance pooling (torch)
    train.py      the training loop (padded mini-batches of bags), instance-level negatives, positive-bag
                  augmentation with annotated cells
    retrieval.py  the training-free retrieval score (FAISS): tiles vs annotated positives and negative-slide tiles
    evaluate.py   cross-validation over the split file's folds, metrics; the MIL-benchmark protocol (10 x 5 CV)

Heat maps of the tile scores are a view (`cytoretrieve.views.heatmap`). Heavy libraries (torch, faiss, sklearn, lancedb) are imported by the modules that need them; importing this
package is light.
"""
