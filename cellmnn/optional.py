"""Dependencies that cellmnn imports where they are first needed, not when ``import cellmnn`` runs.

Each serves only some inputs or outputs, and together they would add seconds to every start of the
command line (and some are absent on GPU machines that only train): these are the only modules a
function of cellmnn may import inside its body (a test walks the package and checks it).
"""
from __future__ import annotations

#: top-level module -> what needs it
LAZY = {
    "anndata": "AnnData and .h5ad input (load_marginals, annotate)",
    "h5py": "backed .h5ad reading (load_marginals(..., backed=True))",
    "pandas": "backed .h5ad reading of obs columns",
    "ot": "exact optimal transport (POT): W1 and the OT-interpolate baseline",
    "sklearn": "PCA of feature tables, ROC/PR scores of the network checks",
    "scipy": "the matrix exponential of the linear ground-truth simulation, sparse fate couplings",
    "matplotlib": "figures (--plot, --heatmap, the demo)",
}
