"""Model definitions (one folder per model family; R1V2 lives in ``r1v``)."""
