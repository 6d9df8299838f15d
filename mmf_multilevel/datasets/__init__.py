"""Dataset builders and datasets every method shares (registered with MMF by ``mmf_multilevel.register``)."""
