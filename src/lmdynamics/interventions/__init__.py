"""Intervention studies: does raising a layer's effective rank make it converge sooner?

The paper leaves the causal question open ("whether increasing the effective rank of a layer
can increase its convergence speed", Limitations; shared/seeds/paper-tending-towards-stability.md).
This subpackage trains *variants* of one suite (:mod:`~lmdynamics.interventions.variants`),
each a named change to training, with the same data order per seed, analyses every
checkpoint of a run in the same process (:mod:`~lmdynamics.interventions.run`), derives
outcome measures and effects against ``baseline`` (:mod:`~lmdynamics.interventions.outcomes`)
and draws them (:mod:`~lmdynamics.interventions.figures`). Nothing here imports zarr or
snakemake, so the GPU script (benchmarks/interventions_gpu.sh) runs where only torch,
transformers, numpy, pandas, xarray and matplotlib are installed.
"""
