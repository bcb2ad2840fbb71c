/* cpu_tile_scalar.c - the tile kernel for the build's baseline ISA. */
#define MOE_TILE_NAME moe_cpu_tile_scalar
#define MOE_TILE_VL   4
#define MOE_TILE_SUB  2
#include "cpu_tile.inc"
