"""Turn-taking, independent of where the audio comes from: frames in, typed events out."""
