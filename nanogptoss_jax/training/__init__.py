"""Training: run configs, the optimiser, the train state and step, the mesh, checkpoints, the loop."""
