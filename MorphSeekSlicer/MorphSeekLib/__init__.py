"""MorphSeek Slicer module library: Qt-free logic, MRML conversions, the worker process and its runs, step preview."""
