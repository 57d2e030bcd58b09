"""Reading and writing other libraries' adapter formats (peft: :mod:`orthotune.interop.peft`)."""
