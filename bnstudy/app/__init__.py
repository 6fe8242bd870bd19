"""The application: Hydra config, run folders, data, wandb, checkpoints, and the job that trains packs."""
