"""modrm: module-level reward models for multi-module LLM agents."""

__version__ = "0.1.0"
