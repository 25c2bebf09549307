"""Runs -> results tables: train every (setup, method, seed), evaluate each on fixed episodes, and tabulate.

* :mod:`kml.results.runs`: which runs to make and making (or resuming, or reusing) them;
* :mod:`kml.results.table`: means over seeds, 95% intervals over seeds and over episodes, paired differences;
* :mod:`kml.results.published`: the published numbers, for rows where the setup matches;
* :mod:`kml.results.plots`: the bar chart;
* :mod:`kml.results.status`: where each run stands, from its files;
* :mod:`kml.results.jobs`: one run as a submitit job (train, evaluate, requeue on preemption);
* :mod:`kml.results.launchers`: submitting the jobs, locally or to Slurm.

``kml-results`` (:mod:`kml.cli.results`) is the command line.
"""

__all__: list[str] = []  # the submodules above are the API (they import pandas and matplotlib)
