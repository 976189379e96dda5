"""The storage layer: session files (writer, reader, v1 contract), disk space, import and export."""
