"""The methods: one adapter on one frozen weight, its parameters and its math (contract: :mod:`.base`, registry: :mod:`.registry`)."""
