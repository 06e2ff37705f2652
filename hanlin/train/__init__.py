"""Training: data preparation, pretraining, SFT and DPO for the same Transformer that Hanlin serves."""
