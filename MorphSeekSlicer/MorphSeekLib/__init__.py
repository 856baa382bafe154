"""MorphSeek Slicer module library: Qt-free logic, MRML conversions, background jobs, step preview."""
