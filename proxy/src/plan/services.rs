//! Services and EndpointSlices -> ServiceTable (helper at work).
