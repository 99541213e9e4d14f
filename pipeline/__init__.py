"""Library code of the preference fine-tuning pipeline (data, models, losses, engine, metrics)."""
