"""voicectl: command line client of the voice platform."""
