"""The pipeline layer: the analysis service, its stages, problems, replay and Dask batch."""
