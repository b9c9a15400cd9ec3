"""monoscope: dictionary learning on language-model MLP layers, features versus neurons."""

__version__ = "0.1.0"
