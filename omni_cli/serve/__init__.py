"""`omni serve`: the network front door — the FastAPI app, chat completions, Realtime events ⇄ the conversation, the page."""
