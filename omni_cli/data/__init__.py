"""`omni data build`: speech instruction data from text — LLM rewrite (optional), TTS on both sides, units, manifest."""
