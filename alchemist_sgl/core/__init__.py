"""Value types shared by recording, the store and the trainer: page keys and recorded rows (pure)."""
