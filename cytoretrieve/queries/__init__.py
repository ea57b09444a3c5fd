"""Questions asked of the store: k-NN classification (`knn`), cross-dataset transfer (`transfer`), similar rows
(`search`) and slide scoring (`mil`). Queries read only the store (and the cohort's small label / split files);
the one exception is `search` embedding a new query image with the table's own backbone."""
