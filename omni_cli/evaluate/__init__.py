"""`omni eval`: score a model as InstructS2S-Eval did — ASR of the speech reply, WER/CER, latency, judge scores."""
