"""Multiple-instance learning over bags of stored vectors: slide scoring (`cytoretrieve score`).

    bags.py       bags from any vector table with a group column + a group-label file (held in memory when they
                  fit, else read slide by slide from the table); annotated positives; MIL benchmark readers
                  (.npz, PRTools .mat) and their import into a store table
    methods.py    the registry of scoring methods (name -> fit function, help, config): `score --method`
    models.py     ABMIL (attention, gated attention), mean / max pooling, top-k instance pooling (torch); the
                  poolings as a registry
    train.py      the training loop (padded mini-batches of bags), instance-level negatives, positive-bag
                  augmentation with annotated cells
    retrieval.py  the training-free retrieval score (FAISS): tiles vs annotated positives and negative-slide tiles
    metrics.py    AUC, ROC, the validation threshold, sensitivity / specificity / F1 / accuracy: one definition each
    evaluate.py   cross-validation over the split file's folds; the MIL-benchmark protocol (10 x 5 CV)
    score.py      `score_table`: a store table scored end to end (returns the result, bags and table)

Heat maps of the tile scores are a view (`cytoretrieve.views.heatmap`). Heavy libraries (torch, faiss, sklearn, lancedb) are imported by the modules that need them; importing this
package is light.
"""
