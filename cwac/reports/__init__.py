"""Tables and plots of the reproduction, rebuilt from run records by ``python -m cwac.reports.build``."""
