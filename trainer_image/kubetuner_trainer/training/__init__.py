"""The training core: loop, LoRA, timestep sampling, losses, checkpoints and config-time checks.

``kubetuner_trainer.train.run(cfg)`` wires these to a model adapter and the data pipeline.
"""
