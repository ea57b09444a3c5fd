"""cytoretrieve: Pap-smear cytology images to a searchable embedding store.

Light on purpose: importing the package (and `cytoretrieve --help`) loads no torch, timm, lancedb or sklearn.
The Python API lives in the submodules: `cytoretrieve.sources.cells`, `cytoretrieve.models.backbones`, `cytoretrieve.store.tables`,
`cytoretrieve.jobs.embed`, `cytoretrieve.queries.knn`, `cytoretrieve.queries.search`.
"""

__version__ = "0.1.0"
