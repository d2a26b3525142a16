"""`omni chat`: the terminal front door — devices, echo canceller, the rich view, the session on disk."""
