// Emulation stand-in: half types as float-backed (the conversions are not what is tested).
#pragma once
struct __half { float v; };
inline float __half2float(__half h) { return h.v; }
inline __half __float2half_rn(float f) { return __half{f}; }
