"""The applications: the ``stemlive`` command line, acquisition, demo, launcher, viewer, tomography, report and
the notebook API."""
