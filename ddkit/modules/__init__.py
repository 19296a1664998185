"""One LightningModule per stage."""
