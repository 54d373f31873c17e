/* tests/c/private_dma.c against the daemon's /dev/ioasid and a device node
 * (tests/c/private_map_ioasid.h) instead of the example daemon. */
#define PRIVATE_MAP_IOASID
#include "private_dma.c"
