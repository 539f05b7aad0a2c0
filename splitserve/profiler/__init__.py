"""``splitserve profile``: this engine's latency profile, measured on this machine.

grid.py (the step shapes run on a real engine), bandwidth.py (KV transfer bytes/s per backend),
measure.py (the workers' StepModels fitted on the grid's steps, plus KV capacity and bandwidth:
a ``splitserve.profile/1`` dict) and cli.py (the command). It sits above the simulator in the
layers, as it writes the format splitserve.sim.profile_files reads.
"""
