"""LOFT's family: a rotation restricted to a support (:mod:`.rotation`), the supports, the transforms on them, and the selection math."""
