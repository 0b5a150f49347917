"""The shared selection pipeline of the sparse methods (select.py drives it):

    statistic over calibration batches (statistics.py; importance.py holds the |W ⊙ G| hooks)
      → reduction to owner ranks (distributed/reduce.py) → budget allocation (budget.py)
      → structure choice per matrix (regions.py) → masks shared to every rank → the masks file (masks.py).

Submodules are imported where they are used: this package's __init__ imports nothing, so distributed/ can import
sparse.importance without a cycle.
"""
