"""`musiq bulk`: score whole catalogues on Ray Data (docs/bulk.md).

The listing and the output layout (`bulk.sources`) need only pyarrow; the pipeline
(`bulk.pipeline`) needs `ray[data]`, the optional extra `bulk`, and imports it only when it runs.
"""
