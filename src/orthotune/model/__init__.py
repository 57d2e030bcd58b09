"""The model: targets found and wrapped, OrthoModel, adapter folders, the Hub, combining adapters."""
