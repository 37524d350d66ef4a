"""One module per stage; each exposes `run(cfg)`, called by Hydra with the composed config."""
