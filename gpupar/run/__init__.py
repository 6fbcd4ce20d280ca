"""What a run leaves on disk: its directory (one run each, claimed and locked) and atomic writes."""
