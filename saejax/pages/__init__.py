"""What a person looks at: pictures and SVG charts (`viz`), a sweep's report page (`report`) and
the feature browser's static site (`browser`)."""
