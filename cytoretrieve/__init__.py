"""cytoretrieve: Pap-smear cytology images to a searchable embedding store.

Light on purpose: importing the package (and `cytoretrieve --help`) loads no torch, timm, lancedb or sklearn.
The Python API lives in the submodules: `cytoretrieve.datasets`, `cytoretrieve.backbones`, `cytoretrieve.store`,
`cytoretrieve.embed`, `cytoretrieve.knn`, `cytoretrieve.search`.
"""

__version__ = "0.1.0"
