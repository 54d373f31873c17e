//! The legacy VFIO (container/group, type1v2) backend of the IOASID engine: the only code that touches VFIO.
