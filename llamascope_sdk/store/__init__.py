"""The feature store and its views: files, search, scores, explanation records and static pages."""
